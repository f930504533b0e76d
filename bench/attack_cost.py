"""Attack cost relative to plain forward + backward passes (DESIGN.md "Performance rules").

For every configuration of a suite, ``t_attack`` is the wall time of the attack over T
samples in batches of ``batch_size`` (exactly as the evaluation engine calls it, gallery
embedded beforehand), and ``t_fb`` the wall time of ``steps`` plain ``model.embed`` forward +
backward passes (gradient w.r.t. the input, parameters frozen, as in PGD) on the same batches.
``ratio = t_attack / t_fb``; the design aims at <= 1.3. The extra cost is the attack loss
(distances to the gallery, hinges), target selection and the two metric forwards (adversarial
and clean) at the end.

Run on the CPU with a small budget (one thread: the machine is shared)::

    .venv/bin/python bench/attack_cost.py --suite configs/suites/quick.yaml --model c2f1 \\
        --data fashion-mnist --num-samples 100 --threads 1

Other models / data: ``--model lenet``, ``--embedding-dim``, ``--data synthetic``,
``--ckpt <run>/checkpoints/x.ckpt`` (data from the run's config.yaml, as eval.py), ``--device cuda``.

ResNet at 224 pixels (the CUB / Cars / SOP models: ImageNet stem, RGB, 512-d; synthetic images of
``--image-size``), a few configurations, with the measured FLOPs of one forward + backward and a
*projected* GPU time (docs/scale.md)::

    .venv/bin/python bench/attack_cost.py --backbone resnet18 --image-size 224 --data synthetic \
        --gallery-size 40 --num-samples 4 --attacks CA+,QA+ --threads 1

``--precision bf16-mixed`` runs the model's forwards under bf16 autocast exactly as
``eval.py --precision bf16-mixed`` does; ``--channels-last`` builds the ResNet with ``channels_last=True``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from robust_ranking.attacks.attack import frozen_eval
from robust_ranking.evaluation.engine import Collectives, RobustnessEvaluator, _pad_to
from robust_ranking.evaluation.options import resolve_suite
from robust_ranking.evaluation.registry import ATTACKS
from robust_ranking.evaluation.suite import Suite


def build_model(args: argparse.Namespace):
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import TripletMarginLoss

    from robust_ranking.lightning_modules import C2F1, LeNet, MetricRanker

    torch.manual_seed(0)
    if args.model in ("resnet18", "resnet50"):
        from robust_ranking.lightning_modules import InputNormalization, ResNet18, ResNet50

        arch = ResNet18 if args.model == "resnet18" else ResNet50
        backbone = arch(in_channels=3, embedding_dim=args.embedding_dim or 512, small_input=args.image_size < 64,
                        channels_last=args.channels_last)
        return MetricRanker(backbone, TripletMarginLoss(margin=0.2, distance=CosineSimilarity()),
                            input_normalization=InputNormalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    dim = args.embedding_dim or (1024 if args.model == "c2f1" else 128)
    backbone = C2F1(embedding_dim=dim) if args.model == "c2f1" else LeNet(embedding_dim=dim)
    return MetricRanker(backbone, TripletMarginLoss(margin=0.2, distance=CosineSimilarity()))


def build_data(args: argparse.Namespace):
    from robust_ranking.data import FashionMNISTDataModule, SyntheticDataModule

    if args.data == "fashion-mnist":
        dm = FashionMNISTDataModule(eval_batch_size=1000)
    else:
        rgb = args.model in ("resnet18", "resnet50")
        shape = (3 if rgb else 1, args.image_size, args.image_size)
        dm = SyntheticDataModule(num_classes=10, train_per_class=1, test_per_class=args.gallery_size // 10,
                                 eval_batch_size=1000, image_shape=shape)
    dm.setup("test")
    return dm


def load_checkpoint(path: str):
    from robust_ranking.data import RetrievalDataModule
    from robust_ranking.evaluation.checkpoints import instantiate, load_ranker, run_config

    ckpt = Path(path)
    model_section, data_section, where = run_config(ckpt, None)
    model = load_ranker(ckpt, model_section, where)
    dm = instantiate(data_section, RetrievalDataModule, "data", where)
    dm.setup("test")
    return model, dm


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_image(model, image: torch.Tensor) -> tuple[float, float]:
    """Measured FLOPs (torch.utils.flop_counter: matmuls and convolutions) of one ``embed`` forward and
    of one forward + backward to the input, per image."""
    from torch.utils.flop_counter import FlopCounterMode

    x = image[:1].clone()
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model.embed(x)
    x.requires_grad_(True)
    with FlopCounterMode(display=False) as both:  # (parameters frozen: the backward is to the input only)
        model.embed(x).sum().backward()
    return float(forward.get_total_flops()), float(both.get_total_flops())


def forward_backward(model, images: torch.Tensor, steps: int) -> None:
    """``steps`` x (embed forward + backward to the input): the PGD loop without the attack loss."""
    x = images.clone().requires_grad_(True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(model.embed(x).sum(), x)
        x = (x.detach() - 1e-3 * grad.sign()).requires_grad_(True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="attack_cost.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="quick", help="a suite YAML or a shipped suite's name")
    parser.add_argument("--num-samples", type=int, default=100, help="T attacked samples")
    parser.add_argument("--batch-size", type=int, default=None, help="attack batch size (default: suite's)")
    parser.add_argument("--model", "--backbone", dest="model", choices=("c2f1", "lenet", "resnet18", "resnet50"),
                        default="c2f1", help="random-init model (resnet*: ImageNet stem, RGB, ImageNet normalization)")
    parser.add_argument("--image-size", type=int, default=28, help="synthetic image side (224 for the DML ResNets)")
    parser.add_argument("--attacks", default=None, help="comma-separated attacks of the suite to run (default: all)")
    parser.add_argument("--precision", choices=("32", "bf16-mixed", "16-mixed"), default="32",
                        help="the model's forwards under this autocast, as eval.py --precision")
    parser.add_argument("--channels-last", action="store_true", help="ResNet backbones with channels_last=True")
    parser.add_argument("--gpu-tflops", type=float, default=300.0,
                        help="effective GPU throughput (TFLOP/s) assumed by the projected GPU time column")
    parser.add_argument("--embedding-dim", type=int, default=None)
    parser.add_argument("--data", choices=("fashion-mnist", "synthetic"), default="fashion-mnist")
    parser.add_argument("--gallery-size", type=int, default=1000, help="synthetic gallery size")
    parser.add_argument("--ckpt", default=None, help="benchmark this checkpoint (data from its run config)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.data == "fashion-mnist" and args.model in ("resnet18", "resnet50"):
        parser.error("--backbone resnet* needs --data synthetic (RGB images of --image-size)")
    model, dm = load_checkpoint(args.ckpt) if args.ckpt else (build_model(args), build_data(args))
    model = model.to(device)
    if args.precision != "32":
        from types import SimpleNamespace

        from pytorch_lightning.plugins.precision import MixedPrecision

        from robust_ranking.evaluation.benchmark import _autocast_model

        plugin = MixedPrecision(args.precision, device.type)
        _autocast_model(model, SimpleNamespace(strategy=SimpleNamespace(precision_plugin=plugin)))
    suite = Suite.from_yaml(resolve_suite(args.suite))
    evaluator = RobustnessEvaluator(suite, num_samples=args.num_samples, batch_size=args.batch_size,
                                    clean_metrics=False, progress=False)
    dataset = dm.eval_set
    evaluator.check(len(dataset))
    configs, skipped = evaluator.plan(model)
    if args.attacks:
        wanted = {a.strip() for a in args.attacks.split(",") if a.strip()}
        configs = [c for c in configs if c.attack in wanted]
        if not configs:
            parser.error(f"--attacks {args.attacks}: none of them is in the suite")
    attacked = evaluator.attacked_indices(len(dataset))
    width = min(evaluator.suite.batch_size, attacked.numel())
    batches = [(_pad_to(b.images, width).to(device), _pad_to(b.indices, width).to(device))
               for b in RobustnessEvaluator._batches(dataset, attacked, evaluator.suite.batch_size)]

    print(f"device {device}, threads {torch.get_num_threads()}, model "
          f"{args.ckpt or f'{args.model} (random init)'}, gallery |X| = {len(dataset)}, "
          f"T = {attacked.numel()}, {len(batches)} batch(es) of {width}, suite {suite.name}, "
          f"image {tuple(dataset[0][0].shape)}, precision {args.precision}")
    with torch.inference_mode(False), torch.no_grad(), frozen_eval(model):
        with torch.enable_grad():
            fwd_flops, fb_flops = flops_per_image(model, batches[0][0])
        print(f"measured FLOPs per image: forward {fwd_flops / 1e9:.3f} G, forward + backward to the input "
              f"{fb_flops / 1e9:.3f} G")
        gallery, _ = evaluator._embed_gallery(model, dataset, Collectives(), 1000, device)
        with torch.enable_grad():
            forward_backward(model, batches[0][0], 2)  # warm-up (allocator, kernels)
            first = ATTACKS.get(configs[0].attack).build(configs[0].eps, configs[0].size, suite.seed,
                                                          **configs[0].options)
            first(model, gallery, *batches[0])

        print(f"{'attack':<8}{'eps':>7}{'w/m':>5}{'steps':>6}{'attack s':>10}{'f+b s':>9}{'ratio':>7}"
              f"{'proj. GPU f+b s':>17}")
        total_attack = total_fb = 0.0
        for config in configs:
            attack = ATTACKS.get(config.attack).build(config.eps, config.size, suite.seed, **config.options)
            if config.eps == 0:
                continue  # PGD does nothing at eps = 0: no reference cost to compare with
            sync(device)
            start = time.perf_counter()
            for images, indices in batches:
                attack(model, gallery, images, indices)
            sync(device)
            t_attack = time.perf_counter() - start
            start = time.perf_counter()
            with torch.enable_grad():
                for images, _ in batches:
                    forward_backward(model, images, attack.steps)
            sync(device)
            t_fb = time.perf_counter() - start
            total_attack, total_fb = total_attack + t_attack, total_fb + t_fb
            size = "" if config.size is None else str(config.size)
            # PROJECTION, not a measurement: the measured FLOPs of the PGD passes at --gpu-tflops.
            projected = fb_flops * attack.steps * attacked.numel() / (args.gpu_tflops * 1e12)
            print(f"{config.attack:<8}{config.eps:>7g}{size:>5}{attack.steps:>6}{t_attack:>10.3f}{t_fb:>9.3f}"
                  f"{t_attack / t_fb:>7.2f}{projected:>17.2e}")
        if total_fb > 0:
            print(f"{'all':<26}{total_attack:>10.3f}{total_fb:>9.3f}{total_attack / total_fb:>7.2f}")
    print(f"(proj. GPU f+b s: a projection from the measured FLOPs at an assumed {args.gpu_tflops:g} TFLOP/s, "
          "not a measurement)")
    for s in skipped:
        print(f"skipped {s.attack}: {s.reason}")
    if math.isnan(total_attack):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

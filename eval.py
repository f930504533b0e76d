"""``python eval.py --ckpt <run>/checkpoints/last.ckpt --suite quick``: the same program as the
``robust-ranking-eval`` console script (:mod:`robust_ranking.cli.eval`)."""

from robust_ranking.cli.eval import main

if __name__ == "__main__":
    main()

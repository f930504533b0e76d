"""``python train.py {fit,validate,test} --config configs/<x>.yaml``: the same program as the
``robust-ranking-train`` console script (:mod:`robust_ranking.cli.train`)."""

from robust_ranking.cli.train import main

if __name__ == "__main__":
    main()

"""The command-line programs: ``robust-ranking-train`` (:mod:`.train`) and ``robust-ranking-eval`` (:mod:`.eval`)."""

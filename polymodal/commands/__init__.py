"""The commands: the only place that parses flags and prints summaries.

Each module holds thin functions (flags -> task/model -> library call -> summary) whose typed
signatures become ``polymodal <command>`` (``polymodal/cli.py``). No command module imports
another, and nothing in the library imports this package (``tests/test_structure.py``).
Training commands share one flag vocabulary (``--data --out --minutes --max-steps --eval-every
--batch-size --lr --device --dtype --resume``, plus ``--config`` and ``--print-config`` from the
CLI) and hand a Task to the one Trainer (``polymodal.train.trainer.run``).
"""

"""gradnorm-bench: time and peak memory of per-sample gradient-norm scoring on a model zoo.

Not part of the runtime package (nothing here ships in a ``.mar``). Run it as
``python -m gradnorm_bench`` with ``bench/`` on ``PYTHONPATH`` (``make bench`` does).

Modules, one job each:
- ``models``: the model classes and builders (toy models, CIFAR ResNet-18, Hugging Face
  wrappers);
- ``zoo``: which models are benchmarked, at which input and batch size;
- ``impls``: the implementations timed (plain passes, our scorer, pytorch-ood, BackPACK);
- ``measure``: one case in this process: warm-up, timed runs, peak memory, score checks;
- ``isolation``: one fresh process per case, forked from a server that imported torch once;
- ``plan``: command-line selection -> the list of cases, with skip reasons;
- ``report``: ratios, targets, text and markdown tables;
- ``environment``: device name, library versions, machine load;
- ``cli``: the command line;
- ``readme``: the README's performance table rendered from a committed results file.
"""

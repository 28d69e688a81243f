"""The library both CLIs and bench/ stand on, in files a reader can name. train.py and predict.py
import only this, common/, model/, lora/ and data/; nothing imports them, and nothing below
(model/, lora/, data/, kernels/, common/) imports engine/.

    config.py      TrainConfig: every training setting once (default, --help, resume), the flags made from it
    setup.py       the run's set-up: its folder, its files, its training record, its rows, the base with fresh adapters
    build.py       the device, the tokenizer (checked against the model), the base model, an adapter's record
    memory.py      what a step needs in memory; --grad-checkpointing auto; what to change when it does not fit; peak host memory
    optim.py       the optimizer and get_lr, the learning-rate schedule
    loss.py        compute_loss (answer / full), count_targets, the chunked cross-entropy
    score.py       p_true at the cue, metrics, the tuned threshold, training's evaluation, ensembles
    checkpoint.py  exact, atomic checkpoints and resume; the run folder's lock
    distributed.py torchrun: the process group, the gradient all-reduce; stopping on a signal
    log.py         metrics.jsonl and loss.png
"""

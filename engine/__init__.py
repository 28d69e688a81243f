"""The library both CLIs and the benchmarks stand on (train.py and predict.py import only this,
model/, lora/ and data/; nothing imports them).

    cli.py         UserError (the base of every input-mistake error) and run_cli
    files.py       atomic writes: a file, a text, a whole folder
    build.py       precision defaults, a base model (+ adapter) on a device
    score.py       p_true at the cue for rows; metrics
    trainer.py     the run's config, the loss, accumulation, the schedule, data-parallel helpers
    checkpoint.py  exact, atomic checkpoints and resume
"""

"""`etalk demo`: the whole system on a fresh CPU machine with nothing downloaded (configs/tiny.py).

  stages.py    the stage graph as data: each step, what it needs, what runs in the side process
  schedule.py  runs that graph in two processes (both cores busy), timing each phase
  wiring.py    what each step does (dataset, frozen encoders, stage configs, training, codebook,
               pipeline checkpoint), the held-out generation, and `run`
  report.py    the report's readers (mouth opening, emotion), lip-sync score and report.json
"""

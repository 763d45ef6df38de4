"""mergekit compatibility, in one place.

    config.py    mergekit-yaml configs -> surgery recipes (``translate``; refs.py: model references, dtypes,
                 what mergekit ignores; multi.py: multi-stage mergekit-multi files)
    methods.py   surgery's operations as mergekit merge methods (the plugin: ``register_all``)
    runner.py    mergekit's own pipeline with those methods registered (`surgery mergekit`)

The merge math itself (mergekit's methods, computed bitwise) is ``surgery.merge``; mergekit-evolve configs are read
by ``surgery.search.genome``. Nothing here imports mergekit at module level.
"""

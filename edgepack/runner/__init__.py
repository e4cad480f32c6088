"""The chains: ``build`` (teacher -> verified bundle, resumable, ``runner.build``) and ``pack`` (a
model -> bundle, ``runner.pack``). A runner resolves the configs, calls the stages in order, keeps the
ledger (``runner.ledger``) and publishes the result; it holds no stage bodies.
"""

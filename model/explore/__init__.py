"""`python -m model.explore neighbors king`: look inside a model from the command line.

Only the command line lives here (in __main__.py); the computations are model.analysis,
the parameter tally model.tally and the figures model.plots.
"""

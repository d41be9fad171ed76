"""Diptych's discrete-event simulator: the services' policy objects in virtual time, with an iteration cost model.

``sim.cost_model`` (iteration times, fitting, presets), ``sim.config`` (cluster description), ``sim.simulator``
(the event loop; ``simulate(config, specs) -> metrics.results.RunResult``), ``sim.capacity`` (binary search for the
highest load meeting a criterion). Pure Python and numpy: no torch, no ZeroMQ.
"""

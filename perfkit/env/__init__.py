"""The machine a run is on: device identity, load and contention, GPU clocks, ceilings."""

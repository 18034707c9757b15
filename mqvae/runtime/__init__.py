"""Where and how a step runs: data-parallel collectives (``distributed``) and the phase profiler (``perf``)."""

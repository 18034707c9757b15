"""Measuring and showing results: the metrics (``metrics``), a model's evaluation on a split (``evaluate``), the
pictures and report of a run (``reports``), and a sweep's comparison of methods over seeds with its statistics
(``comparison``; ``engines.sweep`` runs the runs)."""

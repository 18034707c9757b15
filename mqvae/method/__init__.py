"""The method's own parts: the tasks (``tasks``) and the prior (``prior``), the model and quantizer kinds a config
names (``models``), the hypergradients of Eq. 13 and Betty's methods (``hypergradients``), and the optimizers and
lr schedules (``optim``)."""

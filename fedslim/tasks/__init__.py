"""Tasks that ship with fedslim, written with the public task API (:mod:`fedslim.task`)."""

"""Training a model end to end: config checks at start-up (validate), run set-up (setup), the epoch loop
(loop) and the fit around it (fit), loss and class weights (loss), metrics (metrics), the NaN guard (guard),
the time budget (budget), curves (tracking), SIGINT/SIGTERM (interrupts) and resuming (resume)."""

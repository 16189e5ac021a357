"""Training a model end to end: config checks at start-up (validate), run set-up (setup), the epoch loop
(loop) and the fit around it (fit), loss and class weights (loss), metrics (metrics), paired comparisons of two
models on val (paired), the NaN guard (guard), the time budget's clock (budget), boundary-cached partial
fine-tunes (boundary), weight averaging (averaging), calibration and TTA (calibration), mixup/cutmix (mixing),
curves (tracking), SIGINT/SIGTERM (interrupts) and resuming (resume)."""

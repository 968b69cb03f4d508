"""`tpfleet doctor`: what in this machine's set-up would break a multi-GPU launch, and how to fix it."""

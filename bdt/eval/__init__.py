"""Evaluation on the shapes suite: the pixel judge (`judge`), the fixed prompt suite (`suite`),
generate + judge + report (`run`), and the same every K training steps (`in_loop`)."""

"""The paper's analyses as studies of `bin/study` (Figs. 3, 4, 5, 7, 15 and App. E), one module each."""

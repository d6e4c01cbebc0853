"""The paper's analyses as studies of `bin/study` (Figs. 3, 4, 5, 7, 15, App. E), a module each."""

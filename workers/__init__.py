"""Worker process classes (installed as ``luafcgid.workers``)."""

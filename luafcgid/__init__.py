"""luafcgid: a prefork FastCGI application server for Lua scripts."""

__version__ = "0.1.0"

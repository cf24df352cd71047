"""The ``streaming`` built-in plugin: RFC 9110 resume, large-chunk streaming, durable atomic finalize, content-identity job keys."""

"""The ``legacy`` built-in plugin: the plain behaviour every flag rolls back to, and every hook's last fallback."""

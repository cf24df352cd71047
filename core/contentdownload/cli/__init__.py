"""The command line: parser, commands, progress display and the demo."""

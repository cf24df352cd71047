"""The job side: reading job lists, planning, naming, the workspace, the worker, the pipeline and the runner."""

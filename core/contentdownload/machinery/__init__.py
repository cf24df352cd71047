"""The plugin machinery: loading entry points, flags and config, the policy that chooses, dispatch and telemetry."""

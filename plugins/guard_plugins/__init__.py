"""First-party Activation Guard plugins: detectors, steering and the decision log.

They use only guard's public plugin API (``from guard import hookimpl, Finding, ...``) and
load through the ``guard`` entry-point group like any third-party plugin.
"""

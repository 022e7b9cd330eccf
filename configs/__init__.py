"""The example and default configs (YAML), shipped inside the package as ``medseg.configs`` so an installed medseg
finds them the same way a checkout does (``medseg.config.packaged_config``)."""

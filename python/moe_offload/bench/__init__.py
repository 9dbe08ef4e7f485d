"""The end-to-end benchmark behind `moe-offload bench`: real model shapes with
random weights, routing forced from recorded traces, and every system
measured one after another in one process. Not used by `patch`."""

"""``python -m lora_edge.profile``: the measuring child process (:mod:`lora_edge.profile.child`)."""

from .child import main

main()

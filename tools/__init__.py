"""Tools beside the library, never inside it: ``xdrec plan`` and ``xdrec doctor``, the memory
measure per ZeRO stage and ``make bench`` (per part). They use ``train`` and ``model``; nothing there
imports them."""

"""edgeft.client: the device agent (``edgeft client``). Never imports torch."""

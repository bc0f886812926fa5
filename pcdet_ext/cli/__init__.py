"""What the scripts in ``tools/`` run: each module's ``main(argv)`` parses the flags and makes one call
into the engine or deploy layers (``tools/<name>.py`` only calls ``main``)."""

"""The floor of the house: files, parallel work, progress and process rank; used by every layer, importing nothing above."""

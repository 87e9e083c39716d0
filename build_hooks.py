"""Build step of the wheel: the translation catalogs (bot/locale/*/LC_MESSAGES/fluxbot.po) compiled to
the .mo files gettext reads, next to them in the build. A source checkout reads the .po itself
(bot/i18n.py), so an editable install needs no build step."""

from __future__ import annotations

from pathlib import Path

from setuptools.command.build_py import build_py


class BuildPyWithCatalogs(build_py):
    def run(self) -> None:
        super().run()
        from babel.messages.mofile import write_mo
        from babel.messages.pofile import read_po

        for po in sorted(Path(self.build_lib, "bot", "locale").glob("*/LC_MESSAGES/*.po")):
            with po.open("rb") as source:
                catalog = read_po(source, domain=po.stem)
            with po.with_suffix(".mo").open("wb") as compiled:
                write_mo(compiled, catalog)

"""The help formatter of the training CLIs and `fer`: shows a flag's default only where it tells the reader something."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """ArgumentDefaultsHelpFormatter without "(default: None)" and "(default: False)".

    Those flags fall back to a recipe value or a computed path that their help text already
    names; printing None after it would tell the reader the opposite.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)

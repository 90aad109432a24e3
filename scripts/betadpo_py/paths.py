"""The repository's folders, found from this file (links resolved), so a script's depth does not matter."""
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent
ROOT = SCRIPTS.parent
QUICKSTART = ROOT / "graphs" / "quickstart"
# the fixtures shared beside the checkout (../shared/fixtures); never needed at run time
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"


def script(role, name):
    """The path of a script, e.g. script("tools", "export_hf.py"), as a string for subprocess."""
    return str(SCRIPTS / role / name)

"""Print the lines of a .pth file that shows a new venv this interpreter's packages.

.ci/run's wheel check installs the wheel into a fresh venv (no system site
packages) and writes these lines to a .pth in it, so the venv sees torch,
lark, ... from whichever interpreter runs CI: a plain one or a venv (whose
--system-site-packages child would see the base interpreter's packages, not
the venv's). Lines of a .pth go onto sys.path without the .pth files in those
folders being read, so an editable install of curvc there stays unseen.
"""
import site
import sysconfig

paths = site.getsitepackages() + [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
if site.ENABLE_USER_SITE:
    paths.append(site.getusersitepackages())
print("\n".join(dict.fromkeys(paths)))

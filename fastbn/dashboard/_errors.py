"""The errors of ``fastbn dashboard``."""


class DashboardError(RuntimeError):
    """A step of the dashboard failed; the message says which and why."""


class MissingPackageError(DashboardError):
    """npm packages needed by ``--offline`` are neither cached nor fetchable.

    Attributes
    ----------
    packages : list of str
        ``name@version`` of every missing package.
    """

    def __init__(self, packages, cache, reason):
        self.packages = list(packages)
        names = " ".join(self.packages)
        super().__init__(
            f"offline dashboard: missing npm package(s) {', '.join(self.packages)} "
            f"({reason}). Fetch them where the npm registry is reachable with "
            f"`npm pack {names} --pack-destination DIR` and copy the .tgz files into "
            f"{cache} (or point FASTBN_NPM_CACHE / --npm-cache at DIR).")

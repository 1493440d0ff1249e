import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True, scope="session")
def _one_blas_thread():
    """Fixed BLAS threads: results are bitwise reproducible, tiny products fastest."""
    with threadpool_limits(1):
        yield

"""The test support package: import from its modules (`from support.errors
import expect_error`), never from a conftest module, whose name is not
unique. tests/ is on sys.path through the rootdir conftest."""

"""The native extension is built and importable, and agrees with the package version."""
import fastchat_ft
import fastchat_ft._native as native


def test_native_module_imports_with_package_version():
    assert native.__version__ == fastchat_ft.__version__


def test_kernels_ship_inside_the_package():
    import fastchat_ft.kernels as kernels

    assert kernels.__name__ == "fastchat_ft.kernels"

"""Weight values are judged as the model will hold them, and only named tensors are read."""

import pytest
import torch

from bdt.tokenizer.io import read_state_dict
from bdt.weights import state_dict_problems


def test_values_are_judged_in_the_dtype_the_model_uses():
    """A float64 1e300 passed the NaN/inf check and became inf once cast to the model's float32;
    float8 tensors crashed the check (torch.isfinite does not take them)."""
    expected = {"w": torch.zeros(2)}
    assert state_dict_problems(expected, {"w": torch.tensor([1e300, 0.0], dtype=torch.float64)}) \
        == ["1 tensor(s) with NaN or inf values [w]"]
    assert state_dict_problems(expected, {"w": torch.tensor([1e30, 0.0], dtype=torch.float64)}) == []
    fp32_big = {"w": torch.tensor([1e5, 0.0])}
    assert state_dict_problems(expected, fp32_big) == []
    assert state_dict_problems(expected, fp32_big, dtype=torch.float16) \
        == ["1 tensor(s) with NaN or inf values [w]"]
    fp8 = torch.tensor([0.5, float("nan")]).to(torch.float8_e4m3fn)
    assert state_dict_problems(expected, {"w": fp8}) == ["1 tensor(s) with NaN or inf values [w]"]
    assert state_dict_problems(expected, {"w": fp8[:1].repeat(2)}) == []


@pytest.mark.parametrize("content", [{7: torch.zeros(1)}, {("a", "b"): torch.zeros(1)},
                                     {"a": [1, 2]}, [torch.zeros(1)]])
def test_a_torch_file_of_other_than_named_tensors_is_refused_naming_it(tmp_path, content):
    path = tmp_path / "model.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=f"{path}: expected a mapping of parameter names"):
        read_state_dict(str(path))

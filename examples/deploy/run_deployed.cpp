// Runs an AOTInductor package that calls torch.ops.amnets.* from C++, no Python anywhere:
//
//   run_deployed LIBAMNETS PACKAGE.pt2 INPUT.bin EXPECTED.bin SHAPE [--stream LAYERS,HIDDEN]
//
// loads our native library (which registers the ops with the dispatcher), loads the package, runs it on
// the raw float32 input of shape SHAPE (comma-separated), and compares the first output with EXPECTED.bin
// (Python eager). --stream: the package is one streamed frame, (frame (1, D), h, c (LAYERS, 1, HIDDEN)) ->
// (out (1, HIDDEN), h, c, ...); the input is (T, D) frames, run one call per frame with the state carried
// from zeros, and the expected output is (T, HIDDEN). Exit status 0 when every element is within 1e-4
// (absolute) of the expected one.
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <dlfcn.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::vector<float> read_floats(const std::string& path) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) throw std::runtime_error("cannot read " + path);
  std::vector<float> data(static_cast<size_t>(file.tellg()) / sizeof(float));
  file.seekg(0);
  file.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(float)));
  return data;
}

std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream in(text);
  for (std::string dim; std::getline(in, dim, ',');) shape.push_back(std::stoll(dim));
  return shape;
}

}  // namespace

int main(int argc, char** argv) {
  const bool stream = argc == 8 && std::string(argv[6]) == "--stream";
  if (argc != 6 && !stream) {
    std::cerr << "usage: run_deployed LIBAMNETS PACKAGE.pt2 INPUT.bin EXPECTED.bin SHAPE [--stream LAYERS,HIDDEN]\n";
    return 2;
  }
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {  // registers torch.ops.amnets.*
    std::cerr << "cannot load " << argv[1] << ": " << dlerror() << "\n";
    return 2;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[2]);
    std::vector<float> input = read_floats(argv[3]), expected = read_floats(argv[4]);
    at::Tensor x = at::from_blob(input.data(), parse_shape(argv[5]), at::kFloat).clone();
    at::Tensor y;
    if (stream) {
      const std::vector<int64_t> state_shape = parse_shape(argv[7]);  // (LAYERS, HIDDEN)
      at::Tensor h = at::zeros({state_shape.at(0), 1, state_shape.at(1)}), c = h.clone();
      std::vector<at::Tensor> frames;
      for (int64_t t = 0; t < x.size(0); ++t) {
        std::vector<at::Tensor> out = loader.run({x.narrow(0, t, 1).contiguous(), h, c});
        frames.push_back(out.at(0));
        h = out.at(1);
        c = out.at(2);
      }
      y = at::cat(frames, 0);
    } else {
      y = loader.run({x}).at(0).contiguous();
    }
    if (y.numel() != static_cast<int64_t>(expected.size())) {
      std::cerr << "output has " << y.numel() << " elements, expected " << expected.size() << "\n";
      return 1;
    }
    at::Tensor want = at::from_blob(expected.data(), y.sizes(), at::kFloat);
    const double diff = (y - want).abs().max().item<double>();
    std::printf("run_deployed: output %s, max |C++ - Python eager| = %.3g\n", c10::str(y.sizes()).c_str(), diff);
    return diff <= 1e-4 ? 0 : 1;
  } catch (const std::exception& error) {
    std::cerr << "run_deployed: " << error.what() << "\n";
    return 1;
  }
}

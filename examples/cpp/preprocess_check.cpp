// preprocess_check CONTRACT.json IN.ppm OUT.ppm [OUT.f32] [--preprocessed]
//
// Runs the C++ preprocessing (preprocess.hpp: resize, centre crop, normalise) on one decoded image without
// ONNX Runtime, writing the H x W pixels the network would see (PPM) and optionally the normalised (3, H, W)
// float32 tensor (raw little-endian). CONTRACT.json is a JSON object with a "preprocess" entry (golden.json of
// a bundle, or the model's metadata). The tests compare both outputs with the Python runtime's.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "preprocess.hpp"

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: preprocess_check CONTRACT.json IN.ppm OUT.ppm [OUT.f32]\n";
    return 2;
  }
  try {
    std::ifstream f(argv[1]);
    std::stringstream ss;
    ss << f.rdbuf();
    distillery::Json j = distillery::parse_json(ss.str());
    distillery::Contract c = distillery::contract_from_json(j.has("preprocess") ? j["preprocess"] : j);
    bool pre = std::string(argv[argc - 1]) == "--preprocessed";
    if (pre) --argc;
    distillery::Image px = distillery::network_pixels(c, distillery::read_ppm(argv[2]), pre);
    distillery::write_ppm(argv[3], px);
    if (argc > 4) {
      std::vector<float> x;
      distillery::normalize(c, px, x);
      std::ofstream o(argv[4], std::ios::binary);
      o.write(reinterpret_cast<const char*>(x.data()), std::streamsize(x.size() * sizeof(float)));
    }
  } catch (const std::exception& e) {
    std::cerr << "preprocess_check: " << e.what() << "\n";
    return 2;
  }
  return 0;
}

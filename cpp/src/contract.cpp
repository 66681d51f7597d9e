#include "hmu/contract.hpp"

#include <algorithm>
#include <cmath>
#include <set>
#include <sstream>
#include <utility>

#include "hmu/error.hpp"
#include "hmu/json.hpp"

namespace hmu {
namespace {

// Tensors whose values (not only shapes) the contract constrains; same names as io_contract.py.
const char* const kSrcIds = "src_ids";
const char* const kSrcMask = "src_mask";
const char* const kTgtIds = "tgt_ids";
const char* const kNoise = "noise";
const char* const kProfileAxes[] = {"batch", "src_len", "tgt_len"};

std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

Profile profile_from_json(const Json& p, const std::string& where) {
  if (!p.is_object()) throw Error(where + " must be an object");
  Profile out;
  for (const char* axis : kProfileAxes) {
    const Json* triple = p.find(axis);
    if (!triple) continue;
    const std::string at = where + "." + axis;
    if (!triple->is_array() || triple->array.size() != 3)
      throw Error(at + " must be [min, opt, max]");
    std::array<int64_t, 3> v{};
    for (size_t i = 0; i < 3; ++i) v[i] = triple->array[i].as_int(at);
    if (v[0] < 1 || v[0] > v[1] || v[1] > v[2])
      throw Error(at + " must satisfy 1 <= min <= opt <= max, got " + shape_str({v[0], v[1], v[2]}));
    out.axes[axis] = v;
  }
  if (out.axes.empty()) throw Error(where + " names none of batch, src_len, tgt_len");
  return out;
}

}  // namespace

std::string dims_str(const std::vector<Dim>& dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    out += i ? ", " : "";
    out += dims[i].dynamic() ? "'" + dims[i].name + "'" : std::to_string(dims[i].size);
  }
  return out + "]";
}

std::vector<Profile> profiles_from_config(const Json& config, const std::string& where) {
  const Json* p = config.find("profile");
  if (!p) throw Error(where + " has no 'profile'");
  return {profile_from_json(*p, where + ".profile")};
}

int64_t vocab_from_config(const Json& config, const std::string& where) {
  const Json* model = config.find("model");
  const Json* vocab = model ? model->find("vocab_size") : nullptr;
  if (!vocab) throw Error(where + " has no 'model.vocab_size'");
  return vocab->as_int(where + ".model.vocab_size");
}

int pick_profile(const std::vector<Profile>& profiles, const Contract& contract,
                 const Feeds& feeds) {
  std::vector<std::pair<std::string, int64_t>> sizes;  // dynamic axes, in first-seen order
  for (const auto& spec : contract.inputs) {
    auto it = feeds.find(spec.name);
    if (it == feeds.end()) continue;
    for (size_t k = 0; k < spec.dims.size() && k < it->second.shape.size(); ++k) {
      if (!spec.dims[k].dynamic()) continue;
      const std::string& axis = spec.dims[k].name;
      if (std::none_of(sizes.begin(), sizes.end(), [&](const auto& s) { return s.first == axis; }))
        sizes.emplace_back(axis, it->second.shape[k]);
    }
  }
  int best = -1;
  long double best_volume = 0;
  for (size_t p = 0; p < profiles.size(); ++p) {
    bool fits = true;
    for (const auto& [axis, size] : sizes) {
      auto range = profiles[p].axes.find(axis);
      if (range != profiles[p].axes.end() &&
          (size < range->second[0] || size > range->second[2]))
        fits = false;
    }
    if (!fits) continue;
    long double volume = 1;  // no overflow for any int64 maxima
    for (const auto& [axis, range] : profiles[p].axes) volume *= static_cast<long double>(range[2]);
    if (best < 0 || volume < best_volume) {
      best = static_cast<int>(p);
      best_volume = volume;
    }
  }
  if (best >= 0) return best;
  std::vector<std::string> desc, ranges;
  for (const auto& [axis, size] : sizes) desc.push_back(axis + "=" + std::to_string(size));
  for (const auto& prof : profiles) {
    std::vector<std::string> one;
    for (const auto& [axis, range] : prof.axes)
      one.push_back(axis + " " + std::to_string(range[0]) + ".." + std::to_string(range[2]));
    ranges.push_back(join(one, ", "));
  }
  throw Error("shape " + join(desc, ", ") + " is outside every engine profile (allowed: " +
              join(ranges, " | ") + ")");
}

void validate_feeds(const ModelInfo& info, const Feeds& feeds) {
  const Contract& contract = info.contract;
  std::vector<std::string> missing, names;
  for (const auto& spec : contract.inputs) {
    names.push_back(spec.name);
    if (!feeds.count(spec.name)) missing.push_back(spec.name);
  }
  if (!missing.empty()) throw Error("missing input(s): " + join(missing, ", "));
  std::vector<std::string> extra;
  for (const auto& [name, arr] : feeds)
    if (std::find(names.begin(), names.end(), name) == names.end()) extra.push_back(name);
  if (!extra.empty())
    throw Error("unknown input(s): " + join(extra, ", ") + " (expected " + join(names, ", ") + ")");

  std::vector<std::pair<std::string, int64_t>> bound;  // in first-seen order, like Python's dict
  auto bound_size = [&](const std::string& axis) -> const int64_t* {
    for (const auto& [name, size] : bound)
      if (name == axis) return &size;
    return nullptr;
  };
  for (const auto& spec : contract.inputs) {
    const Array& arr = feeds.at(spec.name);
    const std::string in = "input '" + spec.name + "'";
    if (arr.dtype != spec.dtype)
      throw Error(in + " has dtype " + arr.dtype + ", expected " + spec.dtype);
    if (arr.shape.size() != spec.dims.size())
      throw Error(in + " has rank " + std::to_string(arr.shape.size()) + " (shape " +
                  shape_str(arr.shape) + "), expected rank " + std::to_string(spec.dims.size()) +
                  " " + dims_str(spec.dims));
    for (size_t axis = 0; axis < spec.dims.size(); ++axis) {
      const Dim& dim = spec.dims[axis];
      const int64_t size = arr.shape[axis];
      const std::string at = in + " dim " + std::to_string(axis);
      if (!dim.dynamic()) {
        if (size != dim.size)
          throw Error(at + " is " + std::to_string(size) + ", expected " +
                      std::to_string(dim.size));
      } else if (const int64_t* seen = bound_size(dim.name)) {
        if (*seen != size)
          throw Error(at + " (" + dim.name + ") is " + std::to_string(size) +
                      ", but another input has " + dim.name + " = " + std::to_string(*seen));
      } else {
        bound.emplace_back(dim.name, size);
      }
      if (size < 1)
        throw Error(at + " (" + (dim.dynamic() ? dim.name : std::to_string(dim.size)) +
                    ") is empty");
    }
  }

  if (!info.profiles.empty()) {
    std::vector<std::pair<std::string, int64_t>> sizes;
    for (const auto& [axis, size] : bound)
      for (const char* known : kProfileAxes)
        if (axis == known) sizes.emplace_back(axis, size);
    bool fits = false;
    for (const auto& p : info.profiles) {
      bool all = true;
      for (const auto& [axis, size] : sizes) {
        auto it = p.axes.find(axis);
        if (it != p.axes.end() && (size < it->second[0] || size > it->second[2])) all = false;
      }
      fits = fits || all;
    }
    if (!fits) {
      std::vector<std::string> desc, ranges;
      for (const auto& [axis, size] : sizes) desc.push_back(axis + "=" + std::to_string(size));
      for (const auto& p : info.profiles) {
        std::vector<std::string> one;
        for (const auto& [axis, size] : sizes) {
          auto it = p.axes.find(axis);
          if (it != p.axes.end())
            one.push_back(axis + " " + std::to_string(it->second[0]) + ".." +
                          std::to_string(it->second[2]));
        }
        ranges.push_back(join(one, ", "));
      }
      throw Error("shape outside the profile: " + join(desc, ", ") + " (allowed: " +
                  join(ranges, " | ") + ")");
    }
  }

  auto mask_it = feeds.find(kSrcMask);
  if (mask_it != feeds.end() && mask_it->second.dtype == "int64") {
    const Array& mask = mask_it->second;
    const int64_t* m = mask.as<int64_t>();
    const int64_t n = mask.numel();
    for (int64_t i = 0; i < n; ++i)
      if (m[i] != 0 && m[i] != 1)
        throw Error(std::string("input '") + kSrcMask + "' must hold only 0 (pad) and 1 (token)");
    if (n && mask.shape.size() == 2) {
      const int64_t rows = mask.shape[0], cols = mask.shape[1];
      for (int64_t r = 0; r < rows; ++r) {
        int64_t sum = 0;
        for (int64_t c = 0; c < cols; ++c) sum += m[r * cols + c];
        if (sum == 0)
          throw Error(std::string("input '") + kSrcMask + "' has a row with no real token");
      }
    }
  }
  if (info.vocab_size > 0) {
    for (const char* name : {kSrcIds, kTgtIds}) {
      auto it = feeds.find(name);
      if (it == feeds.end() || it->second.dtype != "int64" || it->second.numel() == 0) continue;
      const int64_t* ids = it->second.as<int64_t>();
      const auto [lo, hi] = std::minmax_element(ids, ids + it->second.numel());
      if (*lo < 0 || *hi >= info.vocab_size)
        throw Error("input '" + std::string(name) + "' has token ids outside [0, " +
                    std::to_string(info.vocab_size) + "): min " + std::to_string(*lo) +
                    ", max " + std::to_string(*hi));
    }
  }
  auto noise_it = feeds.find(kNoise);
  if (noise_it != feeds.end() && noise_it->second.dtype == "float32") {
    const float* x = noise_it->second.as<float>();
    for (int64_t i = 0; i < noise_it->second.numel(); ++i)
      if (!std::isfinite(x[i]))
        throw Error(std::string("input '") + kNoise + "' has non-finite values");
  }
}

}  // namespace hmu

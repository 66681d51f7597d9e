// .npy files (NumPy format 1.0-3.0): C-order, little-endian arrays of any plain dtype.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace hmu {

struct Array {
  std::string dtype;           // numpy dtype name: "int64", "float32", "int32", ...
  std::vector<int64_t> shape;  // empty = scalar
  std::vector<uint8_t> data;   // raw little-endian bytes, C order

  size_t itemsize() const;
  int64_t numel() const;
  template <typename T> const T* as() const { return reinterpret_cast<const T*>(data.data()); }
  template <typename T> T* as() { return reinterpret_cast<T*>(data.data()); }
};

// numpy's name for a descr such as "<i8" -> "int64"; throws hmu::Error for unsupported ones.
std::string dtype_from_descr(const std::string& descr, const std::string& where);
size_t dtype_itemsize(const std::string& dtype);

// Throws hmu::Error with a one-line message (missing file, bad header, truncated data...).
Array read_npy(const std::string& path);
// Writes atomically (temp file + rename), format 1.0.
void write_npy(const std::string& path, const Array& array);

// "[2, 8, 61]"
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace hmu

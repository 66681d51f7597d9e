// One error type for everything a user can get wrong; main() prints it on one line.
#pragma once
#include <stdexcept>
#include <string>

namespace hmu {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// First line of a (possibly multi-line) runtime message, so every error stays one line.
std::string first_line(const std::string& text);

}  // namespace hmu

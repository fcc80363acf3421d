// monet::Error — the one error type of the library. Messages name the file,
// tensor or field at fault and say what was expected.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace monet {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// fail("tensor ", name, ": expected shape ", a, ", found ", b) throws Error.
template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw Error(os.str());
}

}  // namespace monet

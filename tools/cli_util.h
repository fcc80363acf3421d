// Small helpers shared by the subcommands.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

// "1,5,9" -> {1, 5, 9}; throws monet::Error naming the bad item.
std::vector<int32_t> parse_id_list(const std::string& text);

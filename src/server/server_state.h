// What the routes of `monet serve` share (src/server only).
#pragma once
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "monet/chat.h"
#include "monet/image.h"
#include "monet/scheduler.h"
#include "monet/server.h"

namespace monet {

struct Server::State {
  ServeOptions opts;
  httplib::Server http;
  // Set once by the loader; read by the routes only after `ready`.
  ServedModel served;
  std::unique_ptr<BatchScheduler> scheduler;
  std::optional<ChatFormat> chat_format;
  std::string chat_format_error;  // why there is none
  std::string model_name;
  int64_t context = 0;
  std::atomic<bool> ready{false}, stopping{false};
  std::mutex lifecycle;  // the loader's hand-over against shutdown()
  std::exception_ptr load_error;
  std::atomic<int64_t> in_flight{0};  // generation requests whose response is not finished
  std::atomic<int64_t> http_requests{0}, http_errors{0};
  std::atomic<uint64_t> next_response_id{1};
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  int64_t created_unix = 0;
};

// An image sent inline as a data: URL (data:image/png;base64,...), decoded
// (`name` in its errors). A remote URL, a checkpoint without a vision tower,
// bad base64 or a corrupt image throw a 400 naming `param` (a std::exception).
Image decode_image_data_url(const Server::State& st, const std::string& url, const std::string& param,
                            const std::string& name);

void add_viewer_routes(Server::State& st);
void add_openai_routes(Server::State& st);

}  // namespace monet
